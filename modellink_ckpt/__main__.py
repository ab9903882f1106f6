from modellink_ckpt.cli import exit_fast, main

exit_fast(main())
