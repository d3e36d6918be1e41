from .keeper import main

raise SystemExit(main())
