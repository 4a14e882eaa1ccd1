// Checks Adaptive Cards with Microsoft's own parser (npm `adaptivecards`, installed by `make adaptivecards-tools`
// into tests/adaptivecards/node_modules). stdin: a JSON list of cards; stdout: a JSON list of problem lists, one
// per card (empty: the card is valid). A card is valid when the parser, targeting version 1.4, reports no parse or
// validation event and serializes the card back to exactly the input: every element and property was known to it
// and had a valid value (the parser drops what it does not understand).
const path = require("path");
const AC = require(path.join(__dirname, "node_modules", "adaptivecards", "dist", "adaptivecards.js"));

function canonical(v) {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v).sort()) out[k] = canonical(v[k]);
    return out;
  }
  return v;
}

function check(input) {
  const problems = [];
  if (input.type !== "AdaptiveCard") problems.push(`type is ${JSON.stringify(input.type)}, not "AdaptiveCard"`);
  if (input.version !== "1.4") problems.push(`version is ${JSON.stringify(input.version)}, not "1.4"`);
  const target = new AC.Version(1, 4);
  const card = new AC.AdaptiveCard();
  const ctx = new AC.SerializationContext(target);
  card.parse(input, ctx);
  for (let i = 0; i < ctx.eventCount; i++) problems.push(`parse: ${ctx.getEventAt(i).message}`);
  for (const e of card.validateProperties().validationEvents) problems.push(`validate: ${e.message}`);
  const back = card.toJSON(new AC.SerializationContext(target));
  if (!("$schema" in input)) delete back.$schema; // the serializer adds it
  const a = JSON.stringify(canonical(input)), b = JSON.stringify(canonical(back));
  if (a !== b) problems.push(`not understood as given: the parser reads it as ${b}`);
  return problems;
}

let data = "";
process.stdin.on("data", (chunk) => (data += chunk));
process.stdin.on("end", () => {
  const cards = JSON.parse(data);
  process.stdout.write(JSON.stringify(cards.map(check)));
});
