"""The shared failed-login record on the real PostgreSQL fixture (same cases as SQLite)."""

from __future__ import annotations

import pytest

from tests.harness.pgdb import pg_db
from tests.unit import test_loginfail as sqlite_cases

pytestmark = pytest.mark.integration

db = pg_db("t_loginfail_")

test_failures_in_two_processes_add_up = sqlite_cases.test_failures_in_two_processes_add_up
test_a_success_in_one_process_clears_the_user_for_the_other = \
    sqlite_cases.test_a_success_in_one_process_clears_the_user_for_the_other
test_failures_expire_and_old_rows_are_swept = sqlite_cases.test_failures_expire_and_old_rows_are_swept
test_a_flood_of_names_is_bounded_in_the_table_and_in_memory = \
    sqlite_cases.test_a_flood_of_names_is_bounded_in_the_table_and_in_memory
test_database_away_falls_back_to_the_process_counter = sqlite_cases.test_database_away_falls_back_to_the_process_counter
test_the_panel_and_the_mail_logins_count_one_user_together = \
    sqlite_cases.test_the_panel_and_the_mail_logins_count_one_user_together
