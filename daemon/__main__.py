from daemon.cli.app import main

raise SystemExit(main())
