"""Contacts (issue 19): an address-book copy softrelay cannot read, and Smart Contacts
that tell the server neither the numbers asked about nor which of them matched.

    settings.py      the `[contacts]` section
    numbers.py       phone numbers to E.164 (`phonenumbers`), the same on both sides
    oprf.py          RFC 9497 OPRF, mode 0, ristretto255-SHA512 (libsodium via rbcl)
    owners.py        who asks: a SIPIS account's device secret, or a device the PBX
                     digest proof registered; the subject whose book it is
    book.py          the book: opaque, versioned ciphertext chunks in `address_book`
    bookapi.py       /contacts/v1/book: GET + ETag, PUT + If-Match, chunked uploads
    discovery.py     the discoverable set (keyed points), its epochs and the quota
    tagset.py        the published set: tags, version, a bounded journal of deltas (SRD1)
    discoveryapi.py  /contacts/v1/discoverable and /contacts/v1/discovery/...
    api.py           add_contacts_api: the device proof (/contacts/v1/challenge,
                     /contacts/v1/devices) and the routes of both, with their OpenAPI

The app side is in mockphone/: book.py encrypts the book (the server never holds its
key), contacts.py talks to these routes and blinds the numbers it asks about. The
package sits above `dsr` (the PBX digest proof) and `sipis` (the device secret), below
`mockphone` and the composition root.
"""
