from tunegrid.cli import main

raise SystemExit(main())
