"""Sub-command groups of the ``amqtask`` CLI, one module each; ``cli.py`` registers them."""
