"""About 1 KB English texts for bench/nlp.py (written for this bench; news,
science, business and how-to styles, so sentence lengths and topics vary)."""

from __future__ import annotations

from typing import Final

TEXTS: Final = (
    """The city council voted on Tuesday to expand the bus network into the northern suburbs, \
ending a debate that had lasted almost two years. The plan adds four new routes and raises \
the frequency on the busiest line to one bus every six minutes during rush hour. Supporters \
said the change would cut car traffic on the main bridge, where congestion has grown every \
year since the new stadium opened. Opponents argued that the cost, estimated at 40 million \
dollars over five years, would force cuts to road maintenance. The mayor said the money \
would come from a federal grant and from parking fees, not from the maintenance budget. \
Construction of new shelters will begin in the spring. The transit agency expects the first \
new route to open in September, and the others within a year. Residents of the northern \
suburbs, many of whom commute to the hospital district, welcomed the decision. A survey last \
month found that two thirds of them would take the bus if it ran more often.""",
    """Researchers have found that honeybees can learn to recognise simple patterns and \
remember them for days. In a series of experiments, bees were trained to fly towards a \
blue square that hid a drop of sugar water. After a few visits, most bees chose the blue \
square even when the sugar was removed. The team then swapped the square for a circle of \
the same colour, and the bees hesitated, suggesting that they had learned the shape as \
well as the colour. Bees trained in the morning still chose the right shape two days \
later. The researchers say the results show that insect brains, with fewer than a million \
neurons, can form lasting memories of abstract features. They now plan to test whether \
bees can learn rules, such as choosing whichever shape is different from the others. The \
work may help engineers design small robots that navigate with very little computing \
power. It could also explain how bees find the same flowers day after day.""",
    """Our quarterly revenue rose twelve percent to 84 million dollars, driven by strong \
demand for the cloud storage product. Subscription revenue now makes up seventy percent \
of the total, up from sixty percent a year ago. Gross margin improved to 61 percent as \
we moved more customers to the new data centres, which cost less to run. Operating \
expenses grew more slowly than revenue, mainly because hiring slowed in the second half \
of the quarter. Net income was 9 million dollars, compared with a loss of 2 million in the \
same quarter last year. Cash and investments ended the quarter at 210 million dollars. \
Looking ahead, we expect revenue between 88 and 90 million dollars next quarter. The \
board approved a share buyback of up to 50 million dollars. We will keep investing in \
sales in Europe, where customer growth was fastest. The chief executive will present the \
results to analysts on Thursday morning.""",
    """To repot a houseplant, first choose a pot that is only a little larger than the \
old one, with a hole in the bottom for drainage. Water the plant a day before, so the \
roots hold together and slide out easily. Turn the old pot on its side, support the \
stem between your fingers, and gently pull the plant out. If the roots circle tightly \
around the root ball, loosen them with your fingers so they grow outwards. Put a layer \
of fresh potting mix in the new pot, set the plant on it and fill the gaps around the \
sides. Press the soil down lightly, but do not pack it hard, because roots need air. \
Water thoroughly until it runs out of the drainage hole. Keep the plant out of direct \
sun for a week while it recovers. Most plants need repotting every one or two years, \
in spring, when they start to grow again. A plant whose roots grow out of the bottom of \
its pot is telling you it is time.""",
    """The national team won the championship on Sunday after a tense final that went \
to a penalty shootout. The game was level at one goal each after extra time, with both \
goals coming in the first half. The goalkeeper, playing in her first tournament, saved \
two penalties and was named player of the match. Thousands of fans gathered in the \
capital's main square to watch the game on giant screens. The coach said the victory \
was the result of four years of work with young players from regional clubs. The team \
had lost its opening match of the tournament and nearly failed to reach the knockout \
rounds. Since then it has not lost a game. The captain dedicated the trophy to the \
supporters who travelled abroad to follow the team. The players will return home on \
Tuesday, when a parade is planned through the city centre. It is the country's first \
major title in any team sport for more than thirty years.""",
    """A new study suggests that regular walking can lower the risk of heart disease \
as much as more intense exercise. Scientists followed nearly ten thousand adults for \
eight years and recorded how much they walked, ran or cycled each week. People who \
walked briskly for at least thirty minutes on most days had a forty percent lower risk \
of heart attacks than those who were inactive. Runners saw a similar benefit, but no \
greater one, once the total energy spent was taken into account. The researchers say \
walking is easier to keep up, especially for older adults and people with joint pain. \
They caution that the study shows a link, not proof that walking causes the benefit. \
People who walk more may also eat better or smoke less. Still, doctors say the advice is \
simple: any movement is better than none. Short walks after meals may also help control \
blood sugar, according to a separate trial published last year.""",
    """The software update released this week fixes a security flaw that let attackers \
read files on a user's computer. The flaw was in the part of the program that opens \
compressed archives. An attacker could craft an archive that, when opened, wrote files \
outside the chosen folder. Security researchers reported the problem privately two \
months ago, and the company says it has seen no sign that it was used in attacks. Users \
should install the update as soon as possible. Automatic updates are turned on by \
default, so most people will receive the fix within a few days. Businesses that manage \
updates centrally are advised to test and deploy it this week. The update also improves \
the speed of searching large folders and fixes a crash when printing. Older versions of \
the program, which no longer receive updates, remain vulnerable. The company recommends \
that anyone still using them upgrade to a supported version.""",
    """The old railway line through the valley has been turned into a cycling and \
walking path that opened to the public last weekend. The route runs for thirty two \
kilometres between the two market towns and follows the river for most of its length. \
Volunteers spent three years clearing the track, repairing bridges and building new \
fences. The path is almost flat, which makes it suitable for families and for \
wheelchair users. Three of the old stations have been restored as cafes and one houses \
a small museum about the history of the line. The railway closed in 1965, when most \
freight moved to the roads. Local businesses hope the path will bring visitors outside \
the summer season. A bike hire shop has already opened at the southern end. The council \
plans to add lighting to the section near the town centre next year. Organisers ask \
cyclists to ring their bells and slow down when passing walkers.""",
    """Astronomers have detected water vapour in the atmosphere of a planet orbiting a \
small star about a hundred light years away. The planet is about twice the size of Earth \
and takes thirty three days to circle its star. It lies in the zone where temperatures \
could allow liquid water on the surface, although it is probably too hot in practice. \
The team used a space telescope to measure starlight passing through the planet's \
atmosphere as it crossed in front of the star. Water molecules absorb certain colours of \
light, leaving a recognisable fingerprint. The planet may be a rocky world with a thick \
atmosphere, or a small gas planet with no solid surface. Future telescopes should be \
able to tell the difference. The discovery adds to a growing list of worlds where the \
building blocks of life might exist. The researchers stress that water vapour alone \
does not mean the planet could support living things.""",
    """Central bank officials left interest rates unchanged at their meeting on \
Wednesday but signalled that cuts could come later in the year. Inflation has fallen \
for six months in a row and is now close to the bank's target of two percent. However, \
officials said they wanted more evidence that price growth would stay low before \
lowering borrowing costs. Wage growth remains strong, and the labour market is still \
tight, with unemployment near a record low. Markets had expected the decision, and stock \
prices rose slightly after the announcement. The currency fell against the dollar as \
traders bet on lower rates ahead. Mortgage lenders said they would keep their rates \
steady for now. Economists are divided about the timing of the first cut, with some \
expecting it in June and others not before autumn. The bank will publish new forecasts \
for growth and inflation at its next meeting in six weeks.""",
    """Making good bread at home needs only flour, water, salt and yeast, but patience \
matters more than any ingredient. Mix the flour and water first and let them rest for \
half an hour, which lets the flour absorb the water and makes kneading easier. Add the \
salt and yeast, then knead for ten minutes until the dough is smooth and stretchy. Cover \
the bowl and leave it somewhere warm until the dough has doubled in size, usually one to \
two hours. Shape the loaf gently, trying not to knock out all the air. Let it rise again \
while the oven heats to its highest setting. A tray of water in the bottom of the oven \
makes steam, which helps the crust form. Bake for about forty minutes, until the loaf \
sounds hollow when tapped underneath. Let it cool completely before slicing, because \
the inside keeps cooking as it cools. With practice, each loaf turns out a little better.""",
    """The museum will return a collection of carved masks to the community they were \
taken from more than a century ago. The masks were collected by a missionary in the \
1890s and given to the museum by his family in 1923. Community leaders have asked for \
their return for over twenty years, saying the masks are sacred objects used in \
ceremonies. After a review of the records, the museum's board agreed that they had been \
removed without proper consent. The director said returning them was the right thing to \
do and that the museum would work with the community on an exhibition about their \
history. A delegation will travel to collect the masks next month. Several other \
museums in the country are reviewing similar collections. Critics of such returns argue \
that museums make objects available to a wider public. Supporters say that the wishes \
of the communities that made the objects should come first.""",
)
