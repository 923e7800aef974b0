"""Offline long-context evaluation: tasks (tasks, haystack, words), scoring, the sweep
(runner, calibrate, ray_runner), reports (report) and the CLI functions (cli).
See docs/eval.md."""
