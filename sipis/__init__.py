"""SIPIS mode (issue 18): softrelay registers at the SIP provider on behalf of sleeping
apps (the Cloud Softphone role), wakes the app by push on a call or a text, and relays
the call once the app connects.

    accounts.py   the `sip_account` records (HA1s and user encrypted), device secrets
    api.py        /sipis/v1/accounts: create, read status, update, pause, delete
    uac.py        outbound SIP to the providers' registrars (UDP, TCP, TLS)
    registrar.py  keeping each account registered: digest with the HA1, 423, refresh,
                  start spread, rate per registrar, capped backoff, status, un-REGISTER
    appleg.py     the app's own connection: REGISTER with the device secret (Bearer) on
                  softrelay's SIP port; requests to the app and its answers
    calls.py      incoming calls: park, push, 180 Push-Status, deliver, stay in the dialog
    messages.py   text messages: to a connected app, else stored encrypted until it connects
    outgoing.py   calls and texts the app places: to its provider as the account's, the
                  provider's 401/407 answered with the stored HA1 (the app sends none)

It sits above the relay (`proxy`), which carries the app's own connection, and below
`dsr` (erasure un-registers) and the composition root.
"""
