"""Venue simulator (issue 16): ``bookcast simulate`` serves a real capture in a venue's live protocol
(Polymarket market channel, Coinbase Advanced Trade, Kalshi v2) with fault knobs. See ``server`` for the
endpoints and knobs, ``world`` for how a capture becomes each venue's schema (and the Kalshi mapping)."""
