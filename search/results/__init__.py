"""Pure reads of a study: the leaderboard, held-out evaluation, export with its model
card, and the HTML report (:mod:`search.results.report`)."""
