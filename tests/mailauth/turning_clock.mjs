// Preloaded by a test (node --import): Date.now() a second later at each reading, so that
// any two readings of the clock while one message is signed give different seconds.
const realNow = Date.now;
let readings = 0;
Date.now = () => realNow() + 1000 * ++readings;
