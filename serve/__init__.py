"""`ttt-speech serve`, `client` and `sessions`: talk to a TTT-patched Moshi over moshi's websocket protocol."""
