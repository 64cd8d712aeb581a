"""`python -m thumbcli`."""

from thumbcli.cli import run

if __name__ == "__main__":
    run()
