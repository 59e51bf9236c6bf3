"""`aftersales simulate`: realistic after-sales traffic, published as upstream systems would.

`generator` makes the traffic (journeys per kind, duplicates, malformed messages),
`publisher` sends it with publisher confirms, `command` is the command line.
"""
