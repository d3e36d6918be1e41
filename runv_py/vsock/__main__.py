from __future__ import annotations

from .keeper import main

raise SystemExit(main())
