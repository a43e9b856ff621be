"""`kdfast distill`: the CLI end to end, and two CPU processes (gloo) equal to one with the same global batch."""
import json
import os
import subprocess
import sys

import pytest

from kdfast import models
from kdfast.cli import main
from kdfast.data import bundled_records, load_records
from kdfast.distill import DistillConfig, Distiller

ARGS = ["--max-len", "112", "--max-prompt-len", "100", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]


@pytest.fixture
def files(tmp_path):
    tok = models.tiny_tokenizer()
    for name, seed, scale in (("teacher", 1, 0.2), ("student", 2, 0.02)):
        model = models.tiny_model("llama", seed=seed, hidden=32, layers=3, initializer_range=scale)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in bundled_records()[:16])
    return tmp_path


def test_cli_builds_a_student_from_teacher_blocks(files, capsys):
    out = files / "run"
    code = main(["distill", "--teacher", str(files / "teacher"), "--student-layers", "0,2", "--technique", "gkd",
                 "--data", str(files / "train.jsonl"), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--loss", "rkl", *ARGS])
    assert code == 0 and "distill gkd: 2/2 steps" in capsys.readouterr().out
    student, _ = models.load_model(out / "final")
    assert student.config.num_hidden_layers == 2
    assert json.loads((out / "final" / "distill_config.json").read_text())["loss"] == "rkl"


def test_cli_qlora_student_saves_merged_and_a_peft_adapter_on_its_folder(files, capsys):
    out = files / "qlora"
    code = main(["distill", "--student", str(files / "student"), "--technique", "sft", "--lora-rank", "4",
                 "--student-quantize", "nf4", "--data", str(files / "train.jsonl"), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--device", "cpu", *ARGS])
    assert code == 0 and "distill sft: 2/2 steps" in capsys.readouterr().out
    merged, _ = models.load_model(out / "final")
    assert not models.is_quantized(merged)
    adapter = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((files / "student").resolve())
    assert main(["distill", "--student", str(files / "student"), "--technique", "sft", "--student-quantize", "nf4",
                 "--data", str(files / "train.jsonl"), "--out", str(files / "q2"), *ARGS]) == 2
    assert "--lora-rank" in capsys.readouterr().err


def test_cli_errors_are_clean(files, capsys):
    data = ["--data", str(files / "train.jsonl"), "--out", str(files / "x")]
    assert main(["distill", "--student", str(files / "student"), "--technique", "kd", *data]) == 2
    assert "technique 'kd' needs --teacher" in capsys.readouterr().err
    assert main(["distill", "--student-num-layers", "2", "--technique", "sft", *data]) == 2
    assert "build the student from --teacher" in capsys.readouterr().err
    missing = ["--data", str(files / "missing.jsonl"), "--out", str(files / "y")]  # said before the files are read
    assert main(["distill", "--student", str(files / "student"), "--technique", "kd", *missing]) == 2
    assert "technique 'kd' needs --teacher" in capsys.readouterr().err and not (files / "y").exists()
    assert main(["distill", "--teacher", str(files / "teacher"), "--student", str(files / "student"), "--data",
                 str(files / "train.jsonl")]) == 2
    assert "--out is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", "t", "--student", "s", *data, "--loss", "kl"])
    assert "invalid choice: 'kl'" in capsys.readouterr().err
    assert main(["distill", "--teacher", "nowhere", "--student-layers", "0,x", "--technique", "kd", *data]) == 2
    assert "--student-layers '0,x': give teacher block indices separated by commas" in capsys.readouterr().err


def test_two_processes_equal_one(files):
    """torchrun (what `accelerate launch` runs) with 2 gloo processes × batch 2 × accumulation 2 equals one
    process with batch 8: same records per step, gradients averaged over the global token count."""
    out = files / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdfast",
           "distill", "--teacher", str(files / "teacher"), "--student", str(files / "student"), "--technique", "kd",
           "--data", str(files / "train.jsonl"), "--out", str(out), "--batch-size", "2", "--grad-accum", "2",
           "--max-steps", "3", "--device", "cpu", *ARGS]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    teacher, tok = models.load_model(files / "teacher")
    student, _ = models.load_model(files / "student")
    cfg = DistillConfig(technique="kd", batch_size=8, max_steps=3, lr=1e-3, max_len=112, max_prompt_len=100,
                        warmup_steps=0, progress=False)
    single = Distiller(teacher, student, tok, cfg).train(load_records(files / "train.jsonl"))
    both, _ = models.load_model(out / "final")
    init, _ = models.load_model(files / "student")
    diff = max(float((a - b).abs().max()) for a, b in zip(student.state_dict().values(), both.state_dict().values()))
    moved = max(float((a - b).abs().max()) for a, b in zip(student.state_dict().values(), init.state_dict().values()))
    assert moved > 1e-3 and diff < 5e-5
    assert json.loads((out / "summary.json").read_text())["tokens"] == single.tokens


def test_fields_maps_the_columns_of_a_file(files, capsys):
    """distill takes --fields as memorize and attack do; without it the error names the flag to use."""
    with open(files / "qa.jsonl", "w") as f:
        f.writelines(json.dumps({"question": r["instruction"], "answer": r["response"]}) + "\n"
                     for r in bundled_records()[:8])
    run = ["distill", "--student", str(files / "student"), "--technique", "sft", "--data", str(files / "qa.jsonl"),
           "--max-steps", "1", "--batch-size", "4", *ARGS]
    assert main([*run, "--out", str(files / "a")]) == 2
    assert "--fields instruction=COLUMN,response=COLUMN" in capsys.readouterr().err
    assert main([*run, "--out", str(files / "b"), "--fields", "instruction=question,response=answer"]) == 0
    assert "distill sft: 1/1 steps" in capsys.readouterr().out


def test_errors_give_the_fix_as_flags(files, capsys):
    """A fix is given as the flag to pass (with the Python name beside it), never as Python alone."""
    run = ["distill", "--student", str(files / "student"), "--technique", "sft", "--data", str(files / "train.jsonl")]
    cases = [(["--max-len", "64", "--max-prompt-len", "64"], "lower max_prompt_len or raise max_len "
              "(--max-prompt-len, --max-len)"),
             (["--master-weights", "bf16", "--fp16"], "drop fp16 (--fp16) or use --master-weights fp32"),
             (["--max-len", "8", "--max-prompt-len", "2", "--long-prompts", "drop"],
              "raise them (kdfast distill --max-prompt-len/--max-len, the audit's data.max_prompt_len/data.max_len)")]
    for i, (flags, fix) in enumerate(cases):
        assert main([*run, *flags, "--out", str(files / f"e{i}")]) == 2
        assert fix in capsys.readouterr().err
    done = files / "done"
    assert main([*run, "--max-steps", "1", "--out", str(done), *ARGS]) == 0
    assert main([*run, "--max-steps", "1", "--out", str(done), *ARGS]) == 2
    assert "already holds a run; pass --resume (resume=True in Python)" in capsys.readouterr().err


def test_version_and_the_tiny_models_in_help(capsys):
    from kdfast import __version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert f"kdfast {__version__}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "tiny:llama, tiny:gpt2 or tiny:opt" in " ".join(capsys.readouterr().out.split())
