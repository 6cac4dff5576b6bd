"""The operator console (issue 20): a web console on an admin listener of its own that
shows the relay live, with nothing personal beyond what the policy lets an operator see.

    settings.py   `[console]`: listener, admin token, TLS, session TTL, tick, history
    sessions.py   login with the admin token, the session cookie, CSRF and Origin checks
    figures.py    the figures, read from the running services (registry, relay, store,
                  audit, usage, crash reports, DSR trail, cluster heartbeats)
    history.py    counter samples and chart series; the sampler's turn at each tick
    api.py        the JSON API, the event stream (SSE), the actions, their OpenAPI
    server.py     the admin Application and its listener (softrelay/app.py starts it)
    pages.py      the HTML pages' routes and the static files
    layout.py     the frame of every page, the login form; markup.py escapes and formats
    overview.py   the overview page and its charts; views.py the other pages
    static/       console.js, console.css and the vendored chart library (uPlot)

It imports the packages below it and is imported by softrelay/app.py alone.
"""
