"""`python -m listserv` runs the command line."""

from listserv.cli import main

main()
