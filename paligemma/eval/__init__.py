"""Task metrics as PaliGemma's official evaluators define them (`paligemma eval`): `metrics`
(pure functions), `datasets` (annotation formats), `runner` (generation, scores, resume),
`command` (the subcommand). See docs/eval.md."""
