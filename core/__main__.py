from ipaas.cli import main

raise SystemExit(main())
