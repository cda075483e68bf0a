"""Shared pytest setup."""

import sys

from absl import flags

# Grain's worker processes read absl flags; outside app.run they must be parsed once.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
