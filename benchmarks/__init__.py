"""kdfast's benchmarks: a regular package, so `benchmarks.common` is this folder and not the top-level
`benchmarks` package that opacus installs into site-packages."""
