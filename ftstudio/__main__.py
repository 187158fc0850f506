from ftstudio.cli.main import main

raise SystemExit(main())
