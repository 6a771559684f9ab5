"""The periodic-task scheduler behind ``amqtask beat``: schedules, the schedule file, and the beat loop."""
