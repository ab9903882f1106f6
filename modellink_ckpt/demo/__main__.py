from modellink_ckpt.demo.run import main

raise SystemExit(main())
