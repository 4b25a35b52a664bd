"""Writes Parley's labelled retrieval evaluation set (chunks.jsonl, questions.jsonl).

Deterministic (fixed seed): rerunning it reproduces the committed files byte for byte.
Four kinds of knowledge, each with questions of the kind that favours one retriever:

- incidents: near-identical notes that differ in incident numbers, error codes and hosts;
  questions name one identifier, alone or inside a sentence (embeddings blur them);
- parts: a catalogue whose rows differ in part numbers and shelf codes (same);
- people: a directory whose rows differ in names (same);
- howto: procedures, asked about in other words: the questions share no content word
  with their answer (keywords miss them, embeddings do not).

Every question names the one chunk that answers it (`relevant`).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(20261204)

SERVICES = ["checkout", "billing", "search", "login", "inventory", "shipping", "payments",
            "notifications", "reporting", "catalogue", "recommendations", "uploads"]
SYMPTOMS = ["returned 502 responses", "timed out for most requests", "served stale prices",
            "dropped queued messages", "rejected valid sessions", "ran out of disk space",
            "leaked database connections", "answered slowly under load",
            "crashed during start-up", "duplicated outgoing emails"]
CAUSES = ["an expired TLS certificate", "a connection pool set too small",
          "a bad configuration push", "a full log volume", "a clock skew between nodes",
          "a schema migration that locked a table", "a memory leak in the cache client",
          "a DNS record pointing at a retired node", "a retry storm from a partner API",
          "a feature flag enabled for everyone at once"]
FIXES = ["rolled back the last deploy", "renewed the certificate and restarted the pods",
         "raised the pool size and added an alert", "rotated and compressed the logs",
         "resynchronised the clocks with NTP", "finished the migration off-peak",
         "upgraded the cache client", "corrected the DNS record",
         "added a circuit breaker in front of the partner", "turned the flag off"]

MATERIALS = ["stainless steel", "brass", "nylon", "aluminium", "zinc-plated steel", "titanium"]
ITEMS = ["hex bolt", "lock nut", "flat washer", "wood screw", "hinge pin", "cable tie",
         "spring clip", "threaded rod", "rivet", "wall anchor"]
SIZES = ["M4", "M5", "M6", "M8", "M10", "M12"]
SUPPLIERS = ["Nordfast", "Kessler & Sons", "Ibera Metal", "Tokai Parts", "Greenway Supply"]

FIRST = ["Priya", "Tomasz", "Aiko", "Mateo", "Fatima", "Lars", "Chloe", "Kwame", "Ines",
         "Rahul", "Sofia", "Dmitri", "Amara", "Jonas", "Mei", "Omar", "Greta", "Tariq",
         "Lucia", "Henrik", "Yara", "Bruno", "Noor", "Elena", "Kenji", "Zanele", "Pavel",
         "Marisol", "Idris", "Astrid"]
LAST = ["Raman", "Kowalski", "Tanaka", "Herrera", "Haddad", "Lindqvist", "Dubois", "Mensah",
        "Ferreira", "Iyer", "Rossi", "Volkov", "Okafor", "Becker", "Chen", "Farouk", "Nilsen",
        "Aziz", "Moreno", "Dahl", "Salem", "Costa", "Khalil", "Petrova", "Sato", "Dlamini",
        "Novak", "Ortega", "Bello", "Holm"]
ROLES = ["engineering manager", "site reliability engineer", "product designer",
         "data analyst", "support lead", "security engineer", "technical writer",
         "backend developer"]
TEAMS = ["billing", "growth", "platform", "mobile", "data", "support", "identity", "search"]
CITIES = ["Lisbon", "Warsaw", "Osaka", "Bogotá", "Nairobi", "Berlin", "Toronto", "Pune"]
TOPICS = ["the invoice export job", "on-call rotations", "the design system",
          "quarterly dashboards", "refund escalations", "access reviews",
          "the public API reference", "the message queue consumers"]

# Procedures, each asked about twice in words the procedure does not use.
HOWTO = [
    ("To reset your password, open Settings, choose Security and press Forgot password; a link arrives by email within five minutes.",
     ["How do I get back into my account when I can't remember my login secret?",
      "I lost my credentials, what is the recovery route?"]),
    ("Expense receipts must be uploaded to the finance portal before the 25th of each month, otherwise reimbursement moves to the next payroll.",
     ["When is the deadline to claim money back for things I paid for at work?",
      "If I bought supplies myself, by what date should I file for repayment?"]),
    ("The office heating is switched off at weekends; request an exception from facilities by Thursday noon.",
     ["Will it be warm in the building on Saturday and Sunday?",
      "Who do I ask so the radiators stay on when I come in off-hours?"]),
    ("Laptops are replaced every three years; older machines are wiped and donated to local schools.",
     ["How often do we get new computers?",
      "What happens to retired notebooks?"]),
    ("Parental leave is sixteen weeks at full salary for every parent, taken in up to three blocks before the child turns two.",
     ["How long can I stay home after having a baby, and am I paid?",
      "Can mothers and fathers split their time off caring for a newborn?"]),
    ("Production deploys are frozen from December 20 until January 3; urgent fixes need approval from two directors.",
     ["Can we ship releases during the holidays?",
      "Who must sign off if something has to go live over new year?"]),
    ("Visitors sign in at reception, wear a red badge and must be escorted by their host at all times.",
     ["What should guests do when they arrive at the building?",
      "Can someone from outside walk around alone?"]),
    ("Customer data may only be exported with a ticket approved by the privacy officer; exports are encrypted and deleted after thirty days.",
     ["What is the process for pulling client records out of the system?",
      "How long are extracted personal files kept?"]),
    ("The VPN client must be updated to version 7 before March; older versions will be refused at the gateway.",
     ["Do I need to upgrade my remote access software soon?",
      "Why might my tunnel connection stop working in spring?"]),
    ("Lost badges are reported to security immediately; a replacement costs nothing the first time and twenty euros afterwards.",
     ["What do I do if I misplace my entry card?",
      "Is there a fee for getting a new access pass?"]),
    ("Bicycles may be parked in the basement garage; the showers are on the second floor next to the gym.",
     ["Where can I leave my bike and freshen up after cycling to work?",
      "Is there somewhere to wash when arriving by pedal power?"]),
    ("Conference travel needs a budget code from your manager and must be booked through the travel desk at least three weeks ahead.",
     ["How do I arrange a trip to attend an industry event?",
      "How early must flights and hotels for a summit be reserved?"]),
    ("Code reviews should be answered within one working day; large changes are split into pull requests of under four hundred lines.",
     ["How quickly are we expected to look at a colleague's patch?",
      "What size should a proposed change be?"]),
    ("The cafeteria serves vegetarian and vegan dishes every day and publishes its menu on the intranet each Monday.",
     ["Is there food without meat at lunch?",
      "Where can I see what the canteen is cooking this week?"]),
    ("New employees receive their equipment on the first morning and meet their buddy for an onboarding walk at eleven.",
     ["What happens on a starter's first day?",
      "Who shows a newcomer around?"]),
    ("Printers on every floor need your badge to release jobs; colour printing is limited to two hundred pages a month.",
     ["How do I get my documents out of the copier?",
      "Is there a cap on multicolour output?"]),
    ("Sick days do not need a doctor's note for the first three days; from the fourth day a certificate is required.",
     ["When must I show medical proof that I was ill?",
      "Can I stay home unwell for a couple of days without paperwork?"]),
    ("Passwords must be at least fourteen characters and are never shared, not even with the IT helpdesk.",
     ["How long should my login secret be?",
      "Can I tell tech support my credentials if they ask?"]),
    ("The quarterly all-hands meeting happens in the atrium on the first Friday after the quarter closes, followed by drinks.",
     ["When is the company-wide gathering?",
      "Where does everyone meet each season for the big update?"]),
    ("Remote work is allowed up to three days a week; fully remote arrangements need a signed agreement with HR.",
     ["How many days can I work from home?",
      "Can I be based entirely away from the office?"]),
    ("Backups of the main database run every night at two and are kept for ninety days in a second region.",
     ["How often is our primary data copied for safety, and for how long?",
      "If the data centre burns down, where are the copies?"]),
    ("Phishing emails are forwarded to the security mailbox as attachments; never click links in them.",
     ["What should I do with a suspicious message pretending to be the bank?",
      "Where do I report scam mail?"]),
    ("Meeting rooms are booked in the calendar; bookings not checked in within ten minutes are released.",
     ["How do I reserve a space for a team discussion?",
      "What happens if nobody turns up for a room reservation?"]),
    ("Interns are paid monthly and can join any internal training for free.",
     ["Do students on placement get a salary?",
      "Can trainees attend courses at no cost?"]),
    ("Annual performance reviews happen in November; salary changes take effect in January.",
     ["When is appraisal season?",
      "When would a raise show up on my payslip?"]),
    ("Open-source contributions are encouraged, but code written at work needs approval from the legal team before it is published.",
     ["May I share software I wrote for my job on public repositories?",
      "Who must agree before releasing internal programs to the community?"]),
    ("The fire alarm is tested every Wednesday at ten; if it rings at any other time, leave by the nearest stairs and gather in the park.",
     ["What should I do if I hear the siren on a Thursday?",
      "Where do we assemble during an evacuation?"]),
    ("Pets are welcome on Fridays if they are vaccinated and stay on a lead in shared areas.",
     ["Can I bring my dog in?",
      "Are animals allowed at work?"]),
    ("Staff get a yearly learning budget of one thousand euros for books, courses and certifications.",
     ["How much money is there for my professional development?",
      "Can the company pay for a training course I want to take?"]),
    ("Monitors, keyboards and chairs for the home office are ordered through the equipment shop with a limit of five hundred euros.",
     ["Can I get furniture and a screen for working from my flat?",
      "What is the allowance for remote desk gear?"]),
    ("Mobile phones are provided to people on call; personal devices may read email only with the management profile installed.",
     ["Do I get a work handset?",
      "Can I check company messages on my own smartphone?"]),
    ("Invoices from suppliers are paid within thirty days of receipt once the purchase order is matched.",
     ["How long do vendors wait for their money?",
      "When do we settle bills from the companies we buy from?"]),
    ("Incidents are declared in the incident channel; the first responder becomes commander until handing over.",
     ["Who is in charge when production breaks?",
      "Where do I raise the alarm about an outage?"]),
    ("Feature flags older than ninety days are reviewed and removed if they are fully rolled out.",
     ["How do we clean up old toggles?",
      "When are switches for finished launches deleted?"]),
    ("Overtime is compensated with time off at one and a half times the hours worked, agreed with the manager beforehand.",
     ["Do I get anything for staying late?",
      "How are extra hours rewarded?"]),
    ("The library on the third floor lends technical books for four weeks; overdue items block further loans.",
     ["Can I borrow reading material about programming?",
      "What happens if I keep a volume too long?"]),
    ("Customer refunds above five hundred euros need a second approval from the finance team.",
     ["Who has to agree before we give a client a large amount back?",
      "Is there a limit on reimbursing buyers without extra sign-off?"]),
    ("Secrets such as API keys live in the vault; committing them to a repository triggers an automatic rotation.",
     ["Where are credentials for services stored?",
      "What happens if I accidentally push a token to git?"]),
    ("The parking garage opens at six and closes at midnight; electric cars charge for free on level minus two.",
     ["When can I leave my car in the building?",
      "Is there somewhere to top up an EV?"]),
    ("Job referrals that lead to a hire earn a bonus of two thousand euros after the newcomer's probation.",
     ["Do I get a reward for recommending a friend for a position?",
      "How much is paid when someone I suggested joins?"]),
]


def unique_codes(count, make):
    seen = set()
    while len(seen) < count:
        seen.add(make())
    return sorted(seen)


def main():
    chunks, questions = [], []

    def chunk(kind, text):
        chunk_id = f"{kind}-{len(chunks):05d}"
        chunks.append({"id": chunk_id, "kind": kind, "text": text})
        return chunk_id

    incidents = unique_codes(900, lambda: f"INC-{rng.randrange(10000, 99999)}")
    errors = unique_codes(900, lambda: f"E{rng.randrange(1000, 9999)}")
    rng.shuffle(errors)
    incident_rows = []
    for incident, error in zip(incidents, errors):
        service, symptom = rng.choice(SERVICES), rng.choice(SYMPTOMS)
        cause, fix = rng.choice(CAUSES), rng.choice(FIXES)
        host = f"{service[:3]}-{rng.randrange(1, 60):02d}.prod"
        text = (f"Incident {incident}: the {service} service {symptom} with error {error} on host "
                f"{host}. The cause was {cause}; the on-call engineer {fix}.")
        incident_rows.append((chunk("incident", text), incident, error, service, host))

    parts = unique_codes(700, lambda: f"PN-{rng.randrange(1000, 9999)}-{rng.choice('ABCDEFGHJK')}")
    part_rows = []
    for part in parts:
        item, material, size = rng.choice(ITEMS), rng.choice(MATERIALS), rng.choice(SIZES)
        shelf = f"aisle {rng.randrange(1, 40)}, bin {rng.choice('ABCDEF')}{rng.randrange(1, 20)}"
        text = (f"Part number {part}: {material} {item}, size {size}, supplied by "
                f"{rng.choice(SUPPLIERS)}, stocked in {shelf}, reorder at {rng.randrange(20, 500)} units.")
        part_rows.append((chunk("part", text), part, item, shelf))

    names = [(f, l) for f in FIRST for l in LAST]
    rng.shuffle(names)
    people_rows = []
    for first, last in names[:400]:
        role, team, city, topic = rng.choice(ROLES), rng.choice(TEAMS), rng.choice(CITIES), rng.choice(TOPICS)
        text = (f"{first} {last} is a {role} in the {team} team, based in {city}; "
                f"ask {first} about {topic}.")
        people_rows.append((chunk("person", text), f"{first} {last}", role, team))

    for text, asked in HOWTO:
        chunk_id = chunk("howto", text)
        for question in asked:
            questions.append({"kind": "paraphrase", "question": question, "relevant": [chunk_id]})

    for chunk_id, incident, error, service, host in rng.sample(incident_rows, 60):
        form = rng.randrange(4)
        question = [
            f"{incident}",
            f"What caused incident {incident}?",
            f"The {service} service is failing with {error} again, what fixed it last time?",
            f"{error}",
        ][form]
        questions.append({"kind": "identifier", "question": question, "relevant": [chunk_id]})
    for chunk_id, part, item, shelf in rng.sample(part_rows, 40):
        form = rng.randrange(3)
        question = [f"Where is {part} stocked?", f"{part}", f"Who supplies the {item} {part}?"][form]
        questions.append({"kind": "identifier", "question": question, "relevant": [chunk_id]})
    for chunk_id, name, role, team in rng.sample(people_rows, 40):
        form = rng.randrange(3)
        question = [f"Who is {name}?", f"Where is {name} based?", f"What can I ask {name} about?"][form]
        questions.append({"kind": "name", "question": question, "relevant": [chunk_id]})

    with open(HERE / "chunks.jsonl", "w", encoding="utf-8") as out:
        for row in chunks:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(HERE / "questions.jsonl", "w", encoding="utf-8") as out:
        for row in questions:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(chunks)} chunks, {len(questions)} questions")


if __name__ == "__main__":
    main()
