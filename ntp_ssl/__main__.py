"""``python -m ntp_ssl`` is the ``ntp-ssl`` command."""

import sys

from ntp_ssl.cli import main

sys.exit(main())
