"""What the command lines at the package's top share: argument types that range-check as argparse parses."""
