"""tests/cli/test_lifecycle.py through libvirt: create/start/exec/kill/delete/pause/resume."""

from __future__ import annotations

from tests.cli.test_lifecycle import (  # noqa: F401 (collected here again)
    test_bad_bundles_fail_cleanly,
    test_create_start_state_delete_with_stand_in,
    test_events_stream_reports_oom_and_exit,
    test_exec_ps_pause_update_stats,
    test_run_foreground_output_and_exit_code,
    test_signals_reach_the_container,
)
