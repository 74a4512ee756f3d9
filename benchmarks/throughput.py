"""Training and inference throughput of every model at matched sizes, beside the device's
measured matmul and copy ceilings. This script is ``parallax bench throughput`` (same options;
the measuring lives in ``parallax.bench.throughput``)::

    PYTHONPATH=src python benchmarks/throughput.py --json throughput.json
    PYTHONPATH=src python benchmarks/throughput.py --models transformer cws --dim 256 --compile
"""

import sys

from parallax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
