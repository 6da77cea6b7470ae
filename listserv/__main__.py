"""`python -m listserv` runs the command line."""

from listserv.cli import run

# Guarded: the receive workers (listserv/offload.py) start with forkserver,
# which imports the main module again and must not run the CLI there.
if __name__ == "__main__":
    run()
