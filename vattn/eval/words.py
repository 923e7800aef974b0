"""Small word lists for the synthetic tasks (our own; nothing is downloaded).

ADJECTIVES x NOUNS make needle keys ("quiet-lantern"); COMMON_WORDS and
EXTRA_WORDS feed the word-counting tasks. The lists are disjoint.
"""

ADJECTIVES = """
able acid aged airy alert ample angry arid ashen avid awake bald bare basic
bent big bitter bleak blind bold bony brave brief bright brisk broad bumpy
busy calm candid cheap chilly civil clean clear clever close cloudy coarse
cold cool cosy crisp cruel curly curved damp dark dear deep dense dim dirty
dizzy dry dull dusty eager early easy elder empty equal even exact faint
fair false fancy far fast fat fierce firm flat fluffy fond frail free fresh
frozen full funny fuzzy gentle giant glad global glossy golden good grand
great green grim gross handy happy hard harsh hasty heavy hidden high hollow
honest huge humble hungry icy idle inner jolly keen kind large late lazy
lean light little live lively lone long loose loud low loyal lucky lush mad
major mellow merry mild minor misty modern moist muddy mute narrow neat new
nice noble noisy odd oily old open orange outer pale plain plush polite poor
proud pure quick quiet rapid rare raw ready real regal rich rigid ripe rough
round royal rude rusty sad safe salty sandy sharp shiny short shy silent
silky silly simple sleek slim slow small smart smooth snowy soft solid sour
spare spicy stale steep sticky stiff still stormy strict strong sunny super
sweet swift tall tame tart teal tender thick thin tidy tight tiny tough true
ugly upper urban vague vast vivid warm weak weary wet white wide wild windy
wise witty wooden young zesty
""".split()

NOUNS = """
acorn anchor anvil apron arch arrow attic badge bakery ballad banner barn
barrel basket beacon beaver bell bench berry blanket boat bonnet border
bottle boulder bowl branch bridge brook broom bucket bugle bundle butter
button cabin cable camel candle canoe canyon carpet castle cedar cellar chair
chapel cherry chimney circle cliff clock cloud clover comet compass copper
cottage cradle crane crater crystal cup curtain cushion dagger daisy desert
diamond dolphin donkey door dragon drum eagle easel elbow engine falcon
feather fence fern ferry fiddle field flag flute forest fossil fountain fox
garden garlic gate glacier globe glove goat grape harbor harp hammer hat
hawk hazel helmet hill honey horizon horse island ivory jacket jar jewel
kettle kite ladder lake lantern lemon lily lion lizard locket magnet maple
marble meadow mirror mitten monkey moose mountain needle nest oak oasis
ocean olive orchard otter owl paddle palace panda parrot pebble pepper piano
pillow pine planet plum pocket pond poppy puppet quilt rabbit raven ribbon
river robin rocket saddle sail salmon satchel scarf shell shovel silver
skate sled slipper spider spoon spruce squirrel stable statue stone storm
stream sparrow temple thimble thistle thunder tiger timber tower trumpet
tulip tunnel turtle valley velvet violin volcano wagon walnut whistle willow
window wizard wolf wreath yarn zebra
""".split()

COMMON_WORDS = """
apple baker candle dinner engine farmer garden hammer island jacket kitten
ladder market needle orange pencil quartz rabbit saddle teacher umbrella
violet window yellow zipper basket bottle button carrot castle doctor dragon
feather forest guitar helmet kettle lemon marble mirror monkey napkin ocean
parrot pillow pocket rocket salad shadow silver spider tiger tomato tunnel
turkey velvet wallet winter blanket cabbage captain cherry circle cotton
""".split()

# Fillers for word counting: short everyday words with no COMMON_WORDS inside.
EXTRA_WORDS = """
able act add age ago aid aim air all and ant any arm art ask ate awe axe bad
bag ban bar bat bay bed bee beg bet bid big bin bit bow box boy bud bug bun
bus buy cab can cap car cat cod cog cow cry cub cue cup cut dam day den dew
dig dim dip doe dog dot dry due dug dye ear eat ebb egg elf elk elm end era
eve eye fan far fat fax fed fee few fig fin fir fit fix flu fly foe fog fox
fry fun fur gap gas gem gum gut guy gym ham hat hay hen hip hit hog hop hot
hub hue hug hut ice ink inn ion ivy jam jar jaw jet jog joy jug keg key kid
kin kit lab lad lap law lay leg lid lip log lot low mad map mat maw men mix
mob mop mud mug nap net new nod nor now nut oak oar oat odd oil old one opt
orb ore owl own pad pal pan paw pay pea peg pen pet pie pig pin pit ply pod
pot pry pub pun pup rag ram rat raw ray red rib rim rip rod row rub rug rum
run rut rye sad sap saw say sea see set sew shy sip sit ski sky sly sob sod
son sow soy spa spy sum sun tab tag tan tap tar tax tea ten tie tin tip toe
ton top tow toy tub tug two urn use van vat vet vow wag war wax way web wed
wet wig win wit woe wok won yak yam yap yew zap zen zip zoo
""".split()
