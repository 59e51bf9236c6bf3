"""The platform gateway: takes the platforms' after-sales messages as they push them,
checks they come from the platform, maps them to our events and publishes them."""
