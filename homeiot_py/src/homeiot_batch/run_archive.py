"""``python -m homeiot_batch.run_archive``: the seed's daily archive (see ``homeiot.archive``)."""

import sys

from homeiot.archive import main

if __name__ == "__main__":
    sys.exit(main())
