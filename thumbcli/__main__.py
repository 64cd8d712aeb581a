"""`python -m thumbcli`."""

from thumbcli.cli import main

if __name__ == "__main__":
    main()
