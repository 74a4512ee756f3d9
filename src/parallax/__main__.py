from parallax.cli.main import main

raise SystemExit(main())
