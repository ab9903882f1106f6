from modellink_ckpt.cli.entry import convert_ckpt

convert_ckpt()
