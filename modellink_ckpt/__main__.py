from modellink_ckpt.cli import main

raise SystemExit(main())
