"""The `aftersales` command-line tools: front-ends over the services and shared code."""
