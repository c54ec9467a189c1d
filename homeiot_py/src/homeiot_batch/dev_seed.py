"""``python -m homeiot_batch.dev_seed``: the seed's sample data (see ``homeiot.services.dev_seed``)."""

import sys

from homeiot.services.dev_seed import main

if __name__ == "__main__":
    sys.exit(main())
