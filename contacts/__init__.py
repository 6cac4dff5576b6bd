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
    discoveryapi.py  /contacts/v1/discoverable and /contacts/v1/discovery/...
    api.py           add_contacts_api: the routes of both, their OpenAPI description

The app side (encrypting the book, blinding numbers) is in mockphone/contacts.py: the
server never holds the book's key. It sits above `dsr` (the PBX digest proof) and
`sipis` (the device secret), below `mockphone` and the composition root.
"""
