from qmesh.cli import main

raise SystemExit(main())
