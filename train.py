"""UD2M training entry point (LightningCLI). Not implemented yet: it lands with the issue "[ud2m] UD2M training".

This file exists because the top level of the repository is fixed; it refuses to run rather than pretend to train.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: UD2M training is not implemented yet (issue '[ud2m] UD2M training'); see README.md")
