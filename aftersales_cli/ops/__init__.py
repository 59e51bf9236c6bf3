"""The ops commands of `aftersales` (front-ends over services/ops/)."""
