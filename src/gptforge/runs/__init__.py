"""A run directory and what is read from it: the training lock and branches (rundir), which checkpoint a SOURCE means
(choose), metrics.jsonl and its plots (metrics), the experiment trackers (trackers) and the HTML report (report)."""
