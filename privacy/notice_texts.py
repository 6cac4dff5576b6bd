"""The fixed wording of the privacy notice, one dict per language.

Everything a category says comes from the policy; the words around it live here, so a
translation is reviewed in one place (a test keeps the languages' keys equal). A
template's `{name}` is filled by `privacy.markup.fill`, which keeps a field name or an
e-mail address what it is in both Markdown and HTML.
"""

from __future__ import annotations

EN: dict[str, str] = {
    "intro": (
        "This notice is generated from the data policy that the service enforces "
        '(profile "{profile}"): the service stores no field that is not listed here, '
        "and deletes each one as stated."
    ),
    "controller.heading": "Who is responsible",
    "controller": "Controller",
    "email": "Email",
    "dpo": "Data protection officer",
    "never.heading": "Passwords are never stored",
    "never.text": (
        "Passwords are never stored, and neither are other credentials: no category of "
        "data below may hold a field named {names}. Where the service has to pass a "
        "credential on, it forwards it and forgets it."
    ),
    "places.heading": "Where the data is processed",
    "places.intro.transfers": (
        "Our servers and the other recipients of data stand in the countries named below. "
        "Data leaves the EU and the European Economic Area (EU/EEA) only where a "
        "country below is marked as outside it, and only on the basis named there."
    ),
    "places.intro.none": (
        "Our servers and the other recipients of data stand in the countries named below. "
        "No data leaves the EU and the European Economic Area (EU/EEA)."
    ),
    "places.locations": "Our servers",
    "places.recipients": "Other recipients",
    "place.site": "{name} — {country}",
    "place.country": "{country}",
    "place.outside": "{country}, outside the EU/EEA",
    "place.data": "Data: {categories}",
    "place.data.all": "Data: every category above",
    "place.basis": "Basis of the transfer: {basis}",
    "place.basis.detail": "Basis of the transfer: {basis}; {detail}",
    "transfer.adequacy_decision": "adequacy decision of the European Commission (Art. 45 GDPR)",
    "transfer.standard_contractual_clauses": "standard contractual clauses (Art. 46(2)(c) GDPR)",
    "transfer.binding_corporate_rules": "binding corporate rules (Art. 47 GDPR)",
    "transfer.explicit_consent": "your explicit consent (Art. 49(1)(a) GDPR)",
    "categories.heading": "The data we process",
    "purpose": "Purpose",
    "data": "Data",
    "data.memory": (
        "nothing is stored; the data exists only in working memory while it is forwarded"
    ),
    "data.none": "no data fields of its own",
    "never_stored": "Never stored",
    "never_stored.none": "nothing beyond the credentials named above",
    "legal_basis": "Legal basis",
    "location": "Where",
    "stored_at": "Servers",
    "recipients": "Recipients",
    "sent_to": "Sent to",
    "retention": "Retention",
    "rights": "Your rights",
    "rights.none": (
        "none of Art. 15 to 21; the right to complain to a supervisory authority (Art. 77) "
        "always applies"
    ),
    "unlinkable": "Note",
    "protection.encrypted": "encrypted at rest",
    "protection.anonymised": "shortened at write",
    "protection.plain": "not encrypted",
    # {duration} follows a number directly ("365 days after"); {duration_after} follows
    # a preposition, which in German takes another case ("nach 7 Tagen").
    "retention.after_last_use": "deleted {duration} after last use",
    "retention.after_created": "deleted {duration} after it was stored",
    "retention.log_rotation": "log files deleted after {duration_after}",
    "retention.memory_only": "memory only, deleted right after forwarding",
    "unit.year.one": "{n} year",
    "unit.year.many": "{n} years",
    "unit.year.one.after": "{n} year",
    "unit.year.many.after": "{n} years",
    "unit.month.one": "{n} month",
    "unit.month.many": "{n} months",
    "unit.month.one.after": "{n} month",
    "unit.month.many.after": "{n} months",
    "unit.week.one": "{n} week",
    "unit.week.many": "{n} weeks",
    "unit.week.one.after": "{n} week",
    "unit.week.many.after": "{n} weeks",
    "unit.day.one": "{n} day",
    "unit.day.many": "{n} days",
    "unit.day.one.after": "{n} day",
    "unit.day.many.after": "{n} days",
    "unit.hour.one": "{n} hour",
    "unit.hour.many": "{n} hours",
    "unit.hour.one.after": "{n} hour",
    "unit.hour.many.after": "{n} hours",
    "unit.minute.one": "{n} minute",
    "unit.minute.many": "{n} minutes",
    "unit.minute.one.after": "{n} minute",
    "unit.minute.many.after": "{n} minutes",
    "unit.second.one": "{n} second",
    "unit.second.many": "{n} seconds",
    "unit.second.one.after": "{n} second",
    "unit.second.many.after": "{n} seconds",
    "basis.a": "consent",
    "basis.b": "performance of a contract",
    "basis.c": "legal obligation",
    "basis.d": "vital interests",
    "basis.e": "public interest",
    "basis.f": "legitimate interests",
    "right.item": "{name} (Art. {article})",
    "right.heading": "{title} (Art. {article} GDPR)",
    "right.access": "access",
    "right.rectification": "rectification",
    "right.erasure": "erasure",
    "right.restriction": "restriction",
    "right.portability": "portability",
    "right.objection": "objection",
    "rights.heading": "Your rights",
    "rights.intro": (
        "You have the following rights towards the controller, for each category as far "
        "as it lists them above. To use them, write to {email}."
    ),
    "right.access.title": "Right of access",
    "right.access.text": "You may ask whether we process data about you, and get a copy of it.",
    "right.rectification.title": "Right to rectification",
    "right.rectification.text": "You may have inaccurate data about you corrected.",
    "right.erasure.title": "Right to erasure",
    "right.erasure.text": (
        "You may have your data deleted where we no longer need it or may no longer process it."
    ),
    "right.restriction.title": "Right to restriction of processing",
    "right.restriction.text": (
        "You may ask us to restrict processing of your data, for example while its "
        "accuracy is being checked."
    ),
    "right.portability.title": "Right to data portability",
    "right.portability.text": (
        "You may receive the data you provided to us in a structured, commonly used and "
        "machine-readable format, or have it sent to another controller."
    ),
    "right.objection.title": "Right to object",
    "right.objection.text": (
        "You may object to processing based on our legitimate interests (Art. 6(1)(f) GDPR) "
        "on grounds relating to your particular situation. The right to object does not "
        "apply to processing under Art. 6(1)(b) GDPR, which is needed to provide the "
        "service; to end that processing, stop using the service, and the data is deleted "
        "as stated above."
    ),
    "consent.heading": "Withdrawing consent (Art. 7(3) GDPR)",
    "consent.text": (
        "Where we process data based on your consent (Art. 6(1)(a) GDPR), you may withdraw "
        "it at any time; this does not affect the processing before the withdrawal."
    ),
    "right.complaint.title": "Right to lodge a complaint with a supervisory authority",
    "right.complaint.text": (
        "You may complain to a supervisory authority, in particular in the EU member state "
        "of your habitual residence, your place of work or the place of the alleged "
        "infringement."
    ),
    "backups.heading": "Deleted data and backups",
    "backups.text": (
        "Deleted data (at the end of its retention or on your request) is removed from our "
        "live database. Copies of it can remain in our backups and in the database's "
        "archived change log for up to {duration}; then they are deleted too. Should a "
        "backup ever be restored, the deletions made since it was taken are applied again "
        "before the service uses it."
    ),
    "authority.intro": "The supervisory authority responsible for us is:",
    "authority.name": "Authority",
    "authority.address": "Address",
    "authority.email": "Email",
    "authority.phone": "Phone",
    "authority.website": "Website",
}

DE: dict[str, str] = {
    "intro": (
        "Diese Hinweise werden aus der Datenrichtlinie erzeugt, die der Dienst durchsetzt "
        "(Profil „{profile}“): Der Dienst speichert kein Feld, das hier nicht genannt ist, "
        "und löscht jedes wie angegeben."
    ),
    "controller.heading": "Verantwortlicher",
    "controller": "Verantwortlicher",
    "email": "E-Mail",
    "dpo": "Datenschutzbeauftragte(r)",
    "never.heading": "Passwörter werden nie gespeichert",
    "never.text": (
        "Passwörter werden nie gespeichert, ebenso wenig andere Zugangsdaten: Keine der "
        "folgenden Datenkategorien darf ein Feld mit einem dieser Namen enthalten: {names}. "
        "Wo der Dienst Zugangsdaten weitergeben muss, leitet er sie weiter und vergisst sie."
    ),
    "places.heading": "Wo die Daten verarbeitet werden",
    "places.intro.transfers": (
        "Unsere Server und die anderen Empfänger von Daten stehen in den unten genannten "
        "Ländern. Daten verlassen die EU und den Europäischen Wirtschaftsraum (EU/EWR) nur, "
        "wo ein Land unten als außerhalb davon gekennzeichnet ist, und nur auf der dort "
        "genannten Grundlage."
    ),
    "places.intro.none": (
        "Unsere Server und die anderen Empfänger von Daten stehen in den unten genannten "
        "Ländern. Keine Daten verlassen die EU und den Europäischen Wirtschaftsraum (EU/EWR)."
    ),
    "places.locations": "Unsere Server",
    "places.recipients": "Weitere Empfänger",
    "place.site": "{name} — {country}",
    "place.country": "{country}",
    "place.outside": "{country}, außerhalb der EU/des EWR",
    "place.data": "Daten: {categories}",
    "place.data.all": "Daten: alle oben genannten Kategorien",
    "place.basis": "Grundlage der Übermittlung: {basis}",
    "place.basis.detail": "Grundlage der Übermittlung: {basis}; {detail}",
    "transfer.adequacy_decision": (
        "Angemessenheitsbeschluss der Europäischen Kommission (Art. 45 DSGVO)"
    ),
    "transfer.standard_contractual_clauses": (
        "Standardvertragsklauseln (Art. 46 Abs. 2 lit. c DSGVO)"
    ),
    "transfer.binding_corporate_rules": (
        "verbindliche interne Datenschutzvorschriften (Art. 47 DSGVO)"
    ),
    "transfer.explicit_consent": "Ihre ausdrückliche Einwilligung (Art. 49 Abs. 1 lit. a DSGVO)",
    "categories.heading": "Welche Daten wir verarbeiten",
    "purpose": "Zweck",
    "data": "Daten",
    "data.memory": (
        "es wird nichts gespeichert; die Daten liegen nur während der Weiterleitung im "
        "Arbeitsspeicher"
    ),
    "data.none": "keine eigenen Datenfelder",
    "never_stored": "Nie gespeichert",
    "never_stored.none": "nichts über die oben genannten Zugangsdaten hinaus",
    "legal_basis": "Rechtsgrundlage",
    "location": "Speicherort",
    "stored_at": "Server",
    "recipients": "Empfänger",
    "sent_to": "Übermittelt an",
    "retention": "Speicherdauer",
    "rights": "Ihre Rechte",
    "rights.none": (
        "keines der Rechte aus Art. 15 bis 21; das Recht auf Beschwerde bei einer "
        "Aufsichtsbehörde (Art. 77) gilt immer"
    ),
    "unlinkable": "Hinweis",
    "protection.encrypted": "verschlüsselt gespeichert",
    "protection.anonymised": "beim Schreiben gekürzt",
    "protection.plain": "unverschlüsselt",
    "retention.after_last_use": "gelöscht {duration} nach der letzten Nutzung",
    "retention.after_created": "gelöscht {duration} nach der Speicherung",
    "retention.log_rotation": "Protokolldateien gelöscht nach {duration_after}",
    "retention.memory_only": "nur im Arbeitsspeicher, gelöscht direkt nach der Weiterleitung",
    "unit.year.one": "{n} Jahr",
    "unit.year.many": "{n} Jahre",
    "unit.year.one.after": "{n} Jahr",
    "unit.year.many.after": "{n} Jahren",
    "unit.month.one": "{n} Monat",
    "unit.month.many": "{n} Monate",
    "unit.month.one.after": "{n} Monat",
    "unit.month.many.after": "{n} Monaten",
    "unit.week.one": "{n} Woche",
    "unit.week.many": "{n} Wochen",
    "unit.week.one.after": "{n} Woche",
    "unit.week.many.after": "{n} Wochen",
    "unit.day.one": "{n} Tag",
    "unit.day.many": "{n} Tage",
    "unit.day.one.after": "{n} Tag",
    "unit.day.many.after": "{n} Tagen",
    "unit.hour.one": "{n} Stunde",
    "unit.hour.many": "{n} Stunden",
    "unit.hour.one.after": "{n} Stunde",
    "unit.hour.many.after": "{n} Stunden",
    "unit.minute.one": "{n} Minute",
    "unit.minute.many": "{n} Minuten",
    "unit.minute.one.after": "{n} Minute",
    "unit.minute.many.after": "{n} Minuten",
    "unit.second.one": "{n} Sekunde",
    "unit.second.many": "{n} Sekunden",
    "unit.second.one.after": "{n} Sekunde",
    "unit.second.many.after": "{n} Sekunden",
    "basis.a": "Einwilligung",
    "basis.b": "Vertragserfüllung",
    "basis.c": "rechtliche Verpflichtung",
    "basis.d": "lebenswichtige Interessen",
    "basis.e": "öffentliches Interesse",
    "basis.f": "berechtigte Interessen",
    "right.item": "{name} (Art. {article})",
    "right.heading": "{title} (Art. {article} DSGVO)",
    "right.access": "Auskunft",
    "right.rectification": "Berichtigung",
    "right.erasure": "Löschung",
    "right.restriction": "Einschränkung der Verarbeitung",
    "right.portability": "Datenübertragbarkeit",
    "right.objection": "Widerspruch",
    "rights.heading": "Ihre Rechte",
    "rights.intro": (
        "Ihnen stehen gegenüber dem Verantwortlichen die folgenden Rechte zu, für jede "
        "Datenkategorie soweit sie oben genannt sind. Schreiben Sie dazu an {email}."
    ),
    "right.access.title": "Recht auf Auskunft",
    "right.access.text": (
        "Sie können Auskunft verlangen, ob wir Daten über Sie verarbeiten, und eine Kopie "
        "dieser Daten erhalten."
    ),
    "right.rectification.title": "Recht auf Berichtigung",
    "right.rectification.text": "Sie können unrichtige Daten über Sie berichtigen lassen.",
    "right.erasure.title": "Recht auf Löschung",
    "right.erasure.text": (
        "Sie können Ihre Daten löschen lassen, soweit wir sie nicht mehr benötigen oder "
        "nicht mehr verarbeiten dürfen."
    ),
    "right.restriction.title": "Recht auf Einschränkung der Verarbeitung",
    "right.restriction.text": (
        "Sie können verlangen, dass wir Ihre Daten nur eingeschränkt verarbeiten, etwa "
        "solange ihre Richtigkeit geprüft wird."
    ),
    "right.portability.title": "Recht auf Datenübertragbarkeit",
    "right.portability.text": (
        "Sie können die Daten, die Sie uns bereitgestellt haben, in einem strukturierten, "
        "gängigen und maschinenlesbaren Format erhalten oder an einen anderen "
        "Verantwortlichen übermitteln lassen."
    ),
    "right.objection.title": "Widerspruchsrecht",
    "right.objection.text": (
        "Sie können einer Verarbeitung, die auf unseren berechtigten Interessen beruht "
        "(Art. 6 Abs. 1 lit. f DSGVO), aus Gründen Ihrer besonderen Situation widersprechen. "
        "Für die Verarbeitung nach Art. 6 Abs. 1 lit. b DSGVO, die zur Erbringung des "
        "Dienstes erforderlich ist, gilt das Widerspruchsrecht nicht; um sie zu beenden, "
        "nutzen Sie den Dienst nicht mehr, dann werden die Daten wie oben angegeben gelöscht."
    ),
    "consent.heading": "Widerruf der Einwilligung (Art. 7 Abs. 3 DSGVO)",
    "consent.text": (
        "Soweit wir Daten auf Grund Ihrer Einwilligung verarbeiten (Art. 6 Abs. 1 lit. a "
        "DSGVO), können Sie diese jederzeit widerrufen; die Verarbeitung bis zum Widerruf "
        "bleibt davon unberührt."
    ),
    "right.complaint.title": "Recht auf Beschwerde bei einer Aufsichtsbehörde",
    "right.complaint.text": (
        "Sie können sich bei einer Aufsichtsbehörde beschweren, insbesondere in dem "
        "EU-Mitgliedstaat Ihres gewöhnlichen Aufenthaltsorts, Ihres Arbeitsplatzes oder des "
        "Orts des mutmaßlichen Verstoßes."
    ),
    "backups.heading": "Gelöschte Daten und Sicherungen",
    "backups.text": (
        "Gelöschte Daten (am Ende ihrer Speicherdauer oder auf Ihren Antrag) werden aus "
        "unserer laufenden Datenbank entfernt. Kopien davon können bis zu {duration} in "
        "unseren Sicherungen und im archivierten Änderungsprotokoll der Datenbank "
        "verbleiben; danach werden auch sie gelöscht. Muss je eine Sicherung zurückgespielt "
        "werden, werden die seit ihrer Erstellung vorgenommenen Löschungen erneut "
        "ausgeführt, bevor der Dienst sie nutzt."
    ),
    "authority.intro": "Die für uns zuständige Aufsichtsbehörde ist:",
    "authority.name": "Behörde",
    "authority.address": "Anschrift",
    "authority.email": "E-Mail",
    "authority.phone": "Telefon",
    "authority.website": "Website",
}

TEXTS: dict[str, dict[str, str]] = {"en": EN, "de": DE}
