"""The torch-free base every package builds on (serve_cli.base), and beside it the batch-inference CLI
`serve_cli predict` / `info` (__main__, model, pool, output), which reads exported artifacts only."""
