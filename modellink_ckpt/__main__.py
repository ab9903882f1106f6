from modellink_ckpt.entry import convert_ckpt

convert_ckpt()
