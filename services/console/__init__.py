"""The ops web console (`aftersales run console`)."""
