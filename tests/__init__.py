"""The test suite; its folders mirror the packages (bench/, methods/, leaderboard/)."""
