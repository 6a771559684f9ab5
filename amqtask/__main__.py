"""``python -m amqtask`` runs the command line."""

from .cli import main

main()
