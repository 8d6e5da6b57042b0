"""Static leaderboard site built from the results store (rendered with Jinja2)."""
